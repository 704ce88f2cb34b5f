"""Training stages (pretrain, midtrain, sft, rl) and the loop pieces they share."""
