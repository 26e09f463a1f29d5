"""The batching engine: plan, model runner, sampling and the scheduler loop. Never imports HTTP."""
