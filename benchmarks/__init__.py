"""adaptune's benchmark suite: training steps, ops and a rank sweep, side by side with Hugging Face PEFT."""
