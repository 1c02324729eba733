"""HTTP edge of Loom: routes, wire protocol models, the error envelope, SSE.

Nothing below `loom.api` imports it; it converts wire types into serving types and back.
"""
