"""What the tests share, by concern:

- servers: real servers on free ports (`chatqueue serve`, `redis-server`, one that stops on cue)
- http: the OpenAI routes over HTTP: bodies, SSE records, /load and /metrics, waits
- inprocess: uvicorn in a thread around an app built in the test, and runners that fail on cue
- outcomes: one chat completion sent and read to the end, whatever its outcome
- chat: POST /chat and its SSE events
- history_contract: what every HistoryStore must do
"""
