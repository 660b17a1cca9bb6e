"""The compress run: plan the to-do shards, run the stages through an executor, commit each shard, write the manifest."""
