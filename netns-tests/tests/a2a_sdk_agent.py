import sys
import uvicorn
from starlette.applications import Starlette
from a2a.server.routes.agent_card_routes import create_agent_card_routes
from a2a.types import AgentCapabilities, AgentCard, AgentInterface, AgentSkill

port = int(sys.argv[1])
card = AgentCard(
    name="SDK Summarizer Q4",
    description="An agent card served by a2a-sdk",
    version="1.0.0",
    supported_interfaces=[AgentInterface(url=f"http://127.0.0.1:{port}/", protocol_binding="JSONRPC", protocol_version="1.0")],
    capabilities=AgentCapabilities(),
    default_input_modes=["text"],
    default_output_modes=["text"],
    skills=[AgentSkill(id="summarize", name="Summarize", description="Summarizes text", tags=["text", "nlp"])],
)
app = Starlette(routes=create_agent_card_routes(card))
uvicorn.run(app, host="0.0.0.0", port=port, log_level="warning")
