"""Client for InternVideo2-Chat-8B-HD served by Triton (ensemble `videochat`).

    from videochat_client import VideoChatClient
    with VideoChatClient("localhost:8001") as client:
        conv = client.conversation(video="clip.mp4")
        print(conv.ask("What happens in the video?").text)
"""
from .aio import AsyncConversation, AsyncVideoChatClient
from .client import VideoChatClient
from .conversation import AnswerStream, Conversation
from .errors import (AnswerRestarted, Cancelled, DeadlineExceeded, InvalidArgument, MediaNotCached, ServerError,
                     Unavailable,
                     VideoChatError)
from .protocol import GenerationOptions, MediaOptions
from .retry import RetryPolicy
from .types import Answer, Chunk, Timings, Usage

__version__ = "0.1.0"
__all__ = [
    "VideoChatClient", "AsyncVideoChatClient", "Conversation", "AsyncConversation", "AnswerStream",
    "Answer", "Chunk", "Usage", "Timings", "MediaOptions", "GenerationOptions", "RetryPolicy",
    "VideoChatError", "InvalidArgument", "Unavailable", "DeadlineExceeded", "Cancelled", "ServerError",
    "MediaNotCached", "AnswerRestarted",
]
