"""The serve stage: an OpenAI-compatible server for the base model, adapters and registry versions.

state.py builds what a server holds (store, engine, catalog, metrics, canary); app.py turns it into
the fastapi app; routes.py holds the thin endpoints, protocol.py the wire format, generation.py the
path of one generation request (admission, limits, accounting, streaming); engines/ the inference
engines behind one interface; canary.py, catalog.py, store.py, limits.py, observability.py the
parts they share; server.py runs it; feedback.py exports the feedback loop's datasets.
"""
