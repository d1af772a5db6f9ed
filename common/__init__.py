"""Ember: a text-generation inference server.

The distribution maps its top-level folders to one namespace: `common/` is
`ember` itself (small pure-Python pieces both sides share), `proto/` is
`ember.proto`, `router/` `ember.router`, `shard/` `ember.shard` and
`launcher/` `ember.launcher`.
"""

__version__ = "0.1.0"
