"""Runners: who generates a job's tokens. layerbench's streaming runner and the peers it is measured against
(transformers, accelerate, AirLLM) implement one protocol (`base.Runner`), so one measuring loop drives them all."""
