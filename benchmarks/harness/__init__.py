"""The benchmark harness: what a suite declares (:mod:`.protocol`), planning a run (:mod:`.plan`), one
measurement (:mod:`.measure`, :mod:`.memory`), in a fresh process (:mod:`.isolate`), the stamps of a result
(:mod:`.stamps`), its CSV/JSON/PNG and table (:mod:`.report`) and the command line (:mod:`.runner`)."""
