"""Server-side conversations, kept in Redis and shared by every ingress replica."""

from cloudllm_serve.conversations.store import Conversation, ConversationStore, StoredMessage

__all__ = ["Conversation", "ConversationStore", "StoredMessage"]
