from sie_server.cli import main

main()
