"""Defenses against the backdoor, each behind one interface (``base``) and listed in one registry
(``registry``): activation clustering and spectral signatures (``activations``), Neural Cleanse
with unlearning (``cleanse``), STRIP (``strip``). Pure: they import no storage and no Ray;
``runs.detection`` runs them on a finished experiment and retrains without what they flag."""
