"""fedsoda's wire protocol: topics, envelopes, codecs, tensors, blobs, transport, brokers, errors, config."""
