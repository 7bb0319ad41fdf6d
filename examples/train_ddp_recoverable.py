"""A complete recoverable data-parallel training script (the guide's example).

Run it with 4 ranks and one pre-warmed spare, and kill rank 1 at step 50 to watch the
job heal in place:

    mnemo launch --nproc-per-node 4 --spares 1 \
        --inject "rank=1,step=50,kind=kill,phase=forward" examples/train_ddp_recoverable.py --steps 200

Compared with a torchrun + DDP script, four things change (marked "Mnemosyne:").
"""

import argparse
import os

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mnemosyne.jit as mj


def main() -> None:
    """Train a small regression model with in-place recovery."""
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()

    device = torch.device("cuda", int(os.environ["MNEMOSYNE_LOCAL_RANK"])) if torch.cuda.is_available() else "cpu"
    if torch.cuda.is_available():
        torch.cuda.set_device(device)

    torch.manual_seed(0)
    x = torch.randn(8192, 64)
    y = (x @ torch.randn(64, 1)).tanh() + 0.05 * torch.randn(8192, 1)
    dataset = TensorDataset(x, y)

    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.1), nn.Linear(256, 1)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)

    # Mnemosyne: no init_process_group, no DDP wrapper. init() connects to the job,
    # synchronises the state (a replacement receives it from healthy ranks here), and
    # averages gradients in optimizer.step() over fixed buckets.
    job = mj.init(model, optimizer, scheduler=scheduler, seed=0)

    # Mnemosyne: a sampler that can restart mid-epoch (shards like DistributedSampler).
    sampler = mj.ResumableSampler(dataset, job.world_size, job.rank, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=args.batch, sampler=sampler, drop_last=True)

    # Mnemosyne: iterate steps, run each body inside `with step:`. After a failure the
    # iterator recovers and hands out the step to redo.
    for step in job.steps(loader, max_steps=args.steps):
        with step:
            # One batch normally; with `mnemo launch --shrink`, a survivor also runs the
            # batches of a missing replica here (gradient accumulation keeps the global batch).
            for batch in step.micro_batches():
                xb, yb = (t.to(device) for t in batch)
                loss = nn.functional.mse_loss(model(xb), yb)
                loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            # Inside the block: code after it also runs for a step that failed and will be
            # redone (then step.failed is True).
            if job.rank == 0 and step.index % 50 == 0:
                print(f"step {step.index} loss {loss.item():.4f}", flush=True)

    # Mnemosyne: stop the watchdog when training is over.
    job.close()


if __name__ == "__main__":
    main()
