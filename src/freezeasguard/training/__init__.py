"""Fine-tuning under the mask: the training core (train), guarded full and LoRA fine-tuning
(finetune, lora), batches and data, the noise schedule (diffusion), optimizers, multi-process
helpers (dist, shard)."""
