"""The task layer, below train, evaluate, sweep and serve: what running a model on a task means, whichever of
them runs it. The config a user writes (`config`: TrainConfig and its loader, with the objectives' settings in
`objectives` and the adapter section's check in `adapter_section`), loading the base and its tokenizer for it
(`loading`), the task loss (`loss`, with the fused head `head_loss` and the shared-prefix forward
`shared_prefix`), batches (`batching`), validation metrics (`metrics`), checkable answers (`rewards`: the same
rule scores an evaluation and rewards GRPO) and the KL measures between a model and its base (`kl`). The specs
it reads live with what they describe (`data.spec.DataSpec`, `models.spec.ModelSpec`), the prompt renderer
with the data (`data.prompts`). Nothing here imports train, evaluate, sweep, serve or cli (tests/test_layers.py).
"""
