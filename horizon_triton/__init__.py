"""horizon-triton: fine-tune models larger than GPU memory on one GPU."""
