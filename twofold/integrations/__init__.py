"""Adapters that put twofold's fused losses into other trainers: `twofold.integrations.trl` (TRL's GRPOTrainer)
and `twofold.integrations.verl` (verl's policy-loss registry). Each imports its trainer only when it is used."""
