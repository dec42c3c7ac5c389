"""The train stage: pretraining and finetuning on Ray Train + DeepSpeed."""
