"""Serving: one chat call -> engine requests -> one result or a stream. Never touches tensors or HTTP."""
