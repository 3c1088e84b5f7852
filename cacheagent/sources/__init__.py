"""Origins a model can be pulled from, behind one interface (see base.Source)."""
