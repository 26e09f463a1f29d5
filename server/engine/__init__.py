"""The batching engine: scheduling policy, engine loop, plan, model runner, sampling and output. Never imports HTTP."""
