"""The attack: triggers as pure stamping functions (``triggers``), the seeded poisoning of a split and
its manifest (``poison``), and measuring a model against it: accuracy and ASR (``evaluate``)."""
