"""Structured pruning: remove whole layers, MLP channels, attention heads and MoE experts and
write a smaller standard checkpoint (:mod:`.export`), per-family layouts as data
(:mod:`.families`), the scoring criteria (:mod:`.criteria`) and least-squares compensation
(:mod:`.compensate`).  The front end is :func:`aprender.shrink.shrink_checkpoint`."""
