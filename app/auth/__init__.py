"""Who is calling and whether they may: identities (`identity`), API keys (`api_keys`) and JWT
bearer tokens (`tokens`). What each role may do is one table in actors/registry/permissions.py."""
