"""Latency lookup tables and latency-aware losses (docs/latency.md).

* :mod:`dnas.latency.table` — the versioned JSON table format, :class:`LatencyTable`, signature keys;
* :mod:`dnas.latency.published` — ProxylessNAS / once-for-all YAML and FBNet per-layer lists;
* :mod:`dnas.latency.space_latency` — choice points, candidate-op signatures and fixed parts of
  a space; ``latency_matrix(space, table)``;
* :mod:`dnas.latency.loss` — ``expected_latency`` and the penalty forms (``latency_penalty``);
* :mod:`dnas.latency.profile` — ``profile_space`` on the current JAX backend and ``validate``;
* :mod:`dnas.latency.fit` — additive tables from per-architecture measurements;
* :mod:`dnas.latency.cli` — ``dnas latency {profile, fit, validate, show}``.

Nothing is imported here, so that ``dnas.latency.cli`` can be imported before JAX starts.
"""
