"""Rich rendering and wording shared by the commands: info, diff reports (rich, text, markdown), progress. No textual."""
