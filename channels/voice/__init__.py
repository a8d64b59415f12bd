"""Automated voice calls (Twilio Programmable Voice): non-PHI spoken prompts."""
