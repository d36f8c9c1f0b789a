// Translation unit that owns the shared precompiled header (cmake/pch.h).
