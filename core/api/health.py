from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from core.api import get_system
from core.system import System

router = APIRouter(prefix='/api', tags=['health'])


class LlamaServerInfo(BaseModel):
    path: str
    version: str
    source: str


class Health(BaseModel):
    status: str = Field(description='ok, or degraded: serving, but writes to the data dir fail (see problems)')
    problems: list[str] = Field(default_factory=list, description='What is degraded, e.g. a full data dir')
    version: str
    llama_server: LlamaServerInfo | None


@router.get('/health', response_model=Health)
def health(system: System = Depends(get_system)) -> dict[str, Any]:
    return system.health()
