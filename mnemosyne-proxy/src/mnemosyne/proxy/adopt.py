"""Put a model's parameters, gradients and optimizer state into a proxy's arena.

``adopt(model, optimizer, holder)`` swaps every parameter's storage for an arena tensor
(``p.data = ...``: the Parameter objects, and so the optimizer's references, stay the same)
and fills the optimizer's per-parameter state with arena tensors. Names: ``model/<param>``,
``optim/<param>/<key>`` (training state). With ``grads=True`` every parameter also gets an
arena gradient ``scratch/grad/<param>`` (rebuilt every step, so never vouched for nor pulled).

Gradients stay with torch by default: pinning them in the arena forces
``zero_grad(set_to_none=False)``, i.e. a memset per step and a read-add-write accumulate in
backward instead of a plain write, which measured x1.02 step time on an H100 (134M-param
model) for no recovery benefit. To have *every* allocation (gradients and activations
included) in the arena, use the arena allocator (:mod:`mnemosyne.proxy.allocator`) instead.

After a trainer restart the same call finds the tensors by name and swaps them in without a
copy: the model resumes from the committed step. Call order per step afterwards::

    loss.backward()
    holder.begin_update(step)
    optimizer.step()
    holder.commit(step)
    optimizer.zero_grad()   # with grads=True, adopt makes this keep the arena gradients
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mnemosyne.core.errors import ConfigError, StateError
from mnemosyne.core.state import CommitStatus
from mnemosyne.proxy.holder import ProxyAttachResult, ProxyStateHolder

__all__ = ["AdoptResult", "adopt", "init_optimizer_state", "state_names", "store_state"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdoptResult:
    """What :func:`adopt` found and did.

    Attributes:
        status: COMMITTED: the model and optimizer now hold step ``step``'s state (fresh
            state is committed as ``init_step``). TORN: tensors are in place but their
            contents are not consistent; call ``holder.pull(peer)`` (or adopt again with
            ``on_torn="reinit"``).
        step: Last committed step (-1 when none).
        resumed: The state came from the arena (a re-attach), not from the model.
        attach: The holder's attach result.
    """

    status: CommitStatus
    step: int
    resumed: bool
    attach: ProxyAttachResult


def _named_params(model: Any) -> list[tuple[str, Any]]:
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def init_optimizer_state(optimizer: Any) -> None:
    """Create the per-parameter state that Adam/AdamW/SGD would create lazily on their first step.

    It is exactly what those optimizers create (so training is unchanged); other optimizers
    must have taken one step (or loaded a state dict) before :func:`adopt`.

    Raises:
        ConfigError: An optimizer without state whose state layout is not known here.
    """
    import torch

    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if state:
                continue
            if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
                on_device = group.get("capturable") or group.get("fused")
                state["step"] = (torch.zeros((), dtype=torch.float32, device=p.device) if on_device
                                 else torch.tensor(0.0, dtype=torch.float32))
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif isinstance(optimizer, torch.optim.SGD):
                if group.get("momentum", 0):
                    # SGD creates the buffer from the first gradient; an explicit zero buffer with
                    # dampening would differ, so only momentum without dampening is pre-created.
                    if group.get("dampening", 0):
                        msg = "SGD with momentum and dampening: take one step before adopt()"
                        raise ConfigError(msg)
                    state["momentum_buffer"] = torch.zeros_like(p)
            else:
                msg = (f"{type(optimizer).__name__} has no state yet and adopt() does not know its layout: "
                       "take one optimizer step (or load its state dict) before adopt()")
                raise ConfigError(msg)


def state_names(model: Any, optimizer: Any = None, *, grads: bool = False) -> dict[str, Any]:
    """Arena name -> the tensor it will hold (params, optimizer state, and gradients if ``grads``)."""
    import torch

    out: dict[str, Any] = {}
    for name, p in _named_params(model):
        out[f"model/{name}"] = p.data
        if grads and p.requires_grad:
            out[f"scratch/grad/{name}"] = p.grad if p.grad is not None else torch.zeros_like(p)
        if optimizer is not None and p in optimizer.state:
            for key, value in optimizer.state[p].items():
                if isinstance(value, torch.Tensor):
                    out[f"optim/{name}/{key}"] = value
    return out


def adopt(model: Any, optimizer: Any = None, holder: ProxyStateHolder | None = None, *, init_step: int = 0,
          on_torn: str = "return", grads: bool = False) -> AdoptResult:
    """Place ``model``'s (and ``optimizer``'s) state in the proxy's arena, or re-attach to it.

    Args:
        model: A ``torch.nn.Module``.
        optimizer: Its optimizer, or None.
        holder: The holder to use (default: a new one from the environment).
        init_step: Step number committed for a fresh state.
        on_torn: What to do when the arena's state is torn: ``"return"`` (swap the tensors
            in and report TORN, so the caller can pull from a peer) or ``"reinit"`` (copy the
            model's current values in and commit ``init_step``).
        grads: Also pin the gradients in the arena (see the module docstring for the cost).

    Raises:
        StateError: The arena holds a tensor of the same name with another shape or dtype.
    """
    if on_torn not in ("return", "reinit"):
        msg = f"on_torn must be 'return' or 'reinit', got {on_torn!r}"
        raise ConfigError(msg)
    holder = holder or ProxyStateHolder()
    att = holder.attach()
    if optimizer is not None:
        init_optimizer_state(optimizer)
    wanted = state_names(model, optimizer, grads=grads)
    layout_present = all(name in att.tensors for name in wanted)
    resume = att.status is CommitStatus.COMMITTED and layout_present
    torn_keep = att.status is CommitStatus.TORN and on_torn == "return"
    if resume or torn_keep:
        for name, src in wanted.items():
            t = att.tensors.get(name)
            if t is None:
                t = holder.allocate(name, str(src.dtype).removeprefix("torch."), tuple(src.shape), src.device)
            _check_same(name, t, src)
        _swap_in(model, optimizer, holder, grads)
        return AdoptResult(att.status, att.step, resume, att)
    # Fresh (or torn and re-initialised): copy the model's values in under an update marker.
    holder.begin_update(init_step)
    for name, src in wanted.items():
        t = holder.allocate(name, str(src.dtype).removeprefix("torch."), tuple(src.shape), src.device)
        _check_same(name, t, src)
        t.copy_(src)
    _swap_in(model, optimizer, holder, grads)
    holder.commit(init_step)
    return AdoptResult(CommitStatus.COMMITTED, init_step, False, att)


def store_state(model: Any, optimizer: Any, holder: ProxyStateHolder, step: int,
                load: Callable[[], None] | None = None, *, grads: bool = False) -> int:
    """Write ``model``'s and ``optimizer``'s current values into the arena and commit ``step``.

    For a trainer that loaded state from elsewhere (a peer, a checkpoint) after :func:`adopt`:
    ``model.load_state_dict`` writes into the arena parameters in place, but
    ``optimizer.load_state_dict`` replaces the per-parameter state tensors, so the arena no
    longer holds them. This opens ``begin_update(step)``, runs ``load()`` (so that in-place
    writes into the arena happen inside the update: a crash there leaves the arena TORN, never
    a mix that claims a step), copies every state tensor that is not already the arena's
    into it (allocating names the arena lacks), swaps the arena tensors back into the model
    and optimizer, and commits ``step``.

    Args:
        model: The adopted ``torch.nn.Module``.
        optimizer: Its optimizer, or None.
        holder: The holder :func:`adopt` used.
        step: Step number the new contents are committed as.
        load: Called inside the update before the copy (e.g. loads a state dict), or None.
        grads: As given to :func:`adopt`.

    Returns:
        Bytes copied into the arena (tensors already in place are not copied).

    Raises:
        StateError: The arena holds a tensor of the same name with another shape or dtype.
    """
    holder.begin_update(step)
    if load is not None:
        load()
    copied = 0
    for name, src in state_names(model, optimizer).items():
        try:
            t = holder.tensor(name)
        except StateError:
            t = holder.allocate(name, str(src.dtype).removeprefix("torch."), tuple(src.shape), src.device)
        _check_same(name, t, src)
        if t.data_ptr() != src.data_ptr():
            t.copy_(src)
            copied += t.numel() * t.element_size()
    _swap_in(model, optimizer, holder, grads)
    holder.commit(step)
    return copied


def _check_same(name: str, t: Any, src: Any) -> None:
    if tuple(t.shape) != tuple(src.shape) or t.dtype != src.dtype or t.device.type != src.device.type:
        msg = (f"arena tensor {name!r} is {t.dtype}{tuple(t.shape)} on {t.device}, the model has "
               f"{src.dtype}{tuple(src.shape)} on {src.device}: the model changed since the state was saved")
        raise StateError(msg)


def _swap_in(model: Any, optimizer: Any, holder: ProxyStateHolder, grads: bool) -> None:
    import torch

    for name, p in _named_params(model):
        p.data = holder.tensor(f"model/{name}")
        if grads and p.requires_grad:
            g = holder.tensor(f"scratch/grad/{name}")
            g.zero_()
            p.grad = g
        if optimizer is not None and p in optimizer.state:
            for key, value in list(optimizer.state[p].items()):
                if isinstance(value, torch.Tensor):
                    optimizer.state[p][key] = holder.tensor(f"optim/{name}/{key}")
    if grads and optimizer is not None:
        # Gradients must stay in the arena: zero them in place instead of dropping them.
        optimizer.zero_grad = functools.partial(type(optimizer).zero_grad, optimizer, set_to_none=False)
