"""Past-token prediction tooling: per-frame embeddings of a frozen encoder stored once, and the
long-context head fine-tuned from them (`polcache ptp embed` / `polcache ptp finetune`)."""
