"""A complete recoverable FSDP2 / HSDP training script (the guide's "Sharded training" example).

Run it with 4 ranks as a 2x2 HSDP mesh (2 replicas of 2 shards) and one spare, and kill
rank 3 at step 20 to watch only its groups being rebuilt:

    mnemo launch --nproc-per-node 4 --spares 1 \
        --inject "rank=3,step=20,kind=kill,phase=backward" examples/train_fsdp2_recoverable.py --steps 60

Compared with a torchrun + FSDP2 script, four things change (marked "Mnemosyne:").
"""

import argparse
import os

import torch
from torch import nn
from torch.distributed.fsdp import fully_shard

import mnemosyne.jit as mj


class Shards:
    """This rank's batch of step k, a pure function of (rank, k): a re-iterable sized source."""

    def __init__(self, rank: int, batch: int, dim: int) -> None:
        self.rank, self.batch, self.dim = rank, batch, dim

    def __len__(self) -> int:
        return 10_000

    def __iter__(self):
        for k in range(len(self)):
            g = torch.Generator().manual_seed(1000 * k + self.rank)
            x = torch.randn(self.batch, self.dim, generator=g)
            yield x, x.mean(dim=1, keepdim=True)


def main() -> None:
    """Train a small MLP sharded with FSDP2 over an HSDP mesh, with in-place recovery."""
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--dim", type=int, default=64)
    args = p.parse_args()
    world = int(os.environ["MNEMOSYNE_WORLD_SIZE"])

    # Mnemosyne: a DeviceMesh whose groups the job repairs (instead of init_device_mesh).
    mesh = mj.device_mesh((world // 2, 2) if world > 1 else (1,), device_type="cpu")

    # Mnemosyne: a replacement gets its shard inside init(): build on meta, no full init.
    torch.manual_seed(0)
    with torch.device("meta" if mj.joining() else "cpu"):
        model = nn.Sequential(*(nn.Sequential(nn.Linear(args.dim, args.dim), nn.GELU()) for _ in range(4)),
                              nn.Linear(args.dim, 1))
    for block in model:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if mj.joining():
        model.to_empty(device="cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    # Mnemosyne: connect to the job, receive state if this process is a replacement.
    job = mj.init(model, opt, mesh=mesh)

    # Mnemosyne: iterate job.steps() and run each step inside `with step:`.
    for step in job.steps(Shards(job.rank, 16, args.dim), max_steps=args.steps):
        with step:
            x, y = step.batch
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step.index % 20 == 0 and job.rank == 0:
                print(f"step {step.index} loss {loss.item():.4f}", flush=True)
    job.close()


if __name__ == "__main__":
    main()
