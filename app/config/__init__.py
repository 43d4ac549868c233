"""Temper's configuration schema: one pydantic model per job kind, composed from sections.

Every section forbids unknown keys, documents each field, and checks cross-field rules with
errors that name the field. `base` holds what all sections share, one module per section
holds its models, `jobs` composes them per verb, `formats` lists the artifact formats and
`reference` generates the documentation.
"""
