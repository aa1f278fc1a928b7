"""The serve stage: an OpenAI-compatible server for the base model, adapters and registry versions.

state.py builds what a server holds (store, engine, catalog, metrics, limits, canary, worker pools);
app.py turns it into the fastapi app; routes.py holds the thin endpoints, auth.py who is calling
(keys checked at a bounded cost, failures throttled and audited), protocol.py the wire format and
its input contract, generation.py the path of one generation request (admission with reserved
token limits, accounting, streaming); engines/ the inference engines behind one interface;
limits.py (in memory) and limits_redis.py (shared by replicas) the counters; canary.py, catalog.py,
store.py, observability.py the parts they share; server.py runs it; feedback.py exports the
feedback loop's datasets.
"""
