"""The task layer, below train, evaluate, sweep and serve: what running a model on a task means, whichever of
them runs it. Loading the base and its tokenizer for a config (`loading`), the task loss (`loss`, with the
fused head `head_loss` and the shared-prefix forward `shared_prefix`), batches (`batching`), validation
metrics (`metrics`) and the KL measures between a model and its base (`kl`). The specs it reads live with
what they describe (`data.spec.DataSpec`, `models.spec.ModelSpec`), the prompt renderer with the data
(`data.prompts`). Nothing here imports train, evaluate, sweep, serve or cli.
"""
