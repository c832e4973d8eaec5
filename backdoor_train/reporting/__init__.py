"""What a finished run tells a reader: the HTML report (``html``) and terminal tables (``summary``)."""
