"""The demo job shared by ``mnemo demo``, the tests and the recovery benchmark.

* :mod:`~mnemosyne.jit.demo.model` -- a small GPT-style language model.
* :mod:`~mnemosyne.jit.demo.data` -- a deterministic generated token corpus.
* :mod:`~mnemosyne.jit.demo.train` -- the recoverable training script
  (``mnemo launch ... -m mnemosyne.jit.demo.train``).
* :mod:`~mnemosyne.jit.demo.baseline` -- the same training as plain DDP with periodic
  torch.distributed.checkpoint, run under torchrun (the benchmark's baseline).
"""

__all__: list[str] = []
