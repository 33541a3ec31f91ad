"""DHP — Uzbekistan's Digital Health Platform: a FHIR R5 server."""

__version__ = "0.1.0"
