"""Defenses against the backdoor, each behind one interface (``base``) and listed in one registry
(``registry``); ``runner`` runs them on a finished experiment and retrains without what they flag."""
