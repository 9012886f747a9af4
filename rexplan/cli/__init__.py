"""The face: the rex and rex_key commands, their error boundary and rich output."""
