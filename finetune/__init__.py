"""Fine-tuning: the procedural world, pixel metrics, base-model and LoRA training loops."""
