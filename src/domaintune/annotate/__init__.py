"""Annotation of training data by people (and models): projects, blind double labelling, agreement, arbitration,
Label Studio round trips, active-learning selection and an LLM judge with validators for synthetic rows.

A project is a folder (see `project.py`); its finished labels become a data source (`reader: annotations`).
"""
