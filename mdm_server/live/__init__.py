"""Live tracking and the device user's live view (issue 11): what the ingest and
the API announce on the channel ``mdm_live`` when they commit (:mod:`.feed`), and
the fan-out of it to Server-Sent Event streams in ``serve`` (:mod:`.hub`)."""
