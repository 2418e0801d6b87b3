"""OpenAI-compatible HTTP gateway over the thin client's asyncio gRPC transport (`minigpt5 gateway`).

Imports no torch: it installs with the client, plus the `gateway` extra (starlette, uvicorn, openai,
httpx). `create_app(GatewaySettings(triton_url=...))` is the ASGI application. docs/GATEWAY.md
describes the API.
"""
