"""The three tasks (encode, score, extract): for each, its settings, the validation that turns
transport-neutral parameters into a call, and its result types. No torch, no transport."""
