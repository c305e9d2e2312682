"""Adapters that map a training framework's hooks to :class:`ewc.EWC` calls; no maths here."""
