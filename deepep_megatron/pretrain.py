"""``python -m deepep_megatron.pretrain``: GPT MoE pretraining on megatron-core (launch with
torchrun). The command line is :mod:`deepep_megatron.megatron.cli` (flags checked before
megatron-core is imported), the training :mod:`deepep_megatron.megatron.pretrain`."""
from .megatron.cli import main

if __name__ == "__main__":
    main()
