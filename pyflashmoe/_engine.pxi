# _engine.pxi: Model and Session handles (owned by the engine work)
