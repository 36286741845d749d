"""gRPC transport: servicers that translate messages and status codes, and the interceptor around them."""
