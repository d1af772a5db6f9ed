"""Model code: Ember's Llama family on the paged KV cache, and the generic transformers path."""
