"""``python -m deepep_megatron.pretrain``: GPT MoE pretraining on megatron-core (see
``deepep_megatron.megatron.pretrain``; launch with torchrun)."""
from .megatron.pretrain import main

if __name__ == "__main__":
    main()
