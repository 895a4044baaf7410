"""The gpuroute operator: watches ImageJobs and routes them to GPU worker pools."""
